"""Files in and out: checkpoints, data and tokenizers, the Hugging Face Llama shim."""
