"""OpenAI-compatible HTTP server over the `LLM` engine: `attnzoo serve`. Import `attnzoo.server.app.build_app`
(not re-exported here, so the CLI can read serve's options without importing FastAPI)."""
