"""Documents in, Markdown out: opening images and PDFs as pages, the work items of a batch, post-processing the
model's grounding markup into Markdown and figures, writing outputs, and running batches locally or on Ray."""
