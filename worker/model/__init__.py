"""The model: loading it through Transformers, checking its contract, preprocessing, the forward pass, pooling."""
