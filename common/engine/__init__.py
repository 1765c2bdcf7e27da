"""Running a loaded model: the backend interface both backends implement, the engine core (one thread that owns
the backend and its loop), the scheduler (which sequences run, their lanes, prompt chunks), output processing
(detokenizing, stop strings, finish reasons), sampling parameters, the n-gram guard and JSON constraints."""
