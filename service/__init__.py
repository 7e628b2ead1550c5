"""The online service: FastAPI over Redis, onnxruntime and FAISS. Never imports torch, models or training."""
