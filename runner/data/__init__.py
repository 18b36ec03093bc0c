"""What the model reads: the book (corpus), its ASCII-128 tokenizer, and the training batches."""
