"""Front ends that serve a trained model: the synthesis command (`synthesize`, `python -m vall_e`),
the OpenAI-compatible HTTP server (`server`, with request batching in `batching`) and the Gradio
web UI (`webui`). FastAPI and Gradio are optional extras, imported only by the modules that need them."""
