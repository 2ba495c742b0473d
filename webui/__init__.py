"""The Gradio side of the app: everything `app.py` needs besides its layout.

- `lifecycle`: signals and a clean exit, start-up logging, the malloc arena cap
  (standard library only, so `app.py` installs it before the slow imports);
- `warmup`: the background GMACs warm-up, which stops when asked;
- `files`: the output file store (uniquely named PNGs, served in place);
- `inputs`: the upload guard, keep-ratio parsing and the examples;
- `formatting`: method choices and notes from the registry, the cost table, the
  readouts and the page's texts;
- `handlers`: the request handlers, the views of an analysis, the trade-off plot
  glue, and the mapping of errors to ``gr.Error``.

Dependencies point one way: `webui` imports `vlm_demo` and gradio; `vlm_demo`
imports neither.
"""
