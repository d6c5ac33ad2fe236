/* tokenizer.c - to be written */
