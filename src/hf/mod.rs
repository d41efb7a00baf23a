//! Hugging Face config.json → decode-step graph.
