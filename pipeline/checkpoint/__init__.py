"""The crash-safe checkpoint store: records and verification, the background writer, the reader of saved
weights, and conversion to DeepSpeed's universal format for a resume on another number of ranks."""
