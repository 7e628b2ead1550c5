"""The online service (next milestone). Never imports torch, models or training."""
