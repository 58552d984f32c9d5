"""Key layouts of LoKr files: name maps built forward from the model, and readers."""
