"""What users choose: each option once, as a flag and its DSOCR_* variable, read the same way by the CLI and
the server, with the value types that refuse a bad value in one line."""
