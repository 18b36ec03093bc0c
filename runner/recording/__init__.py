"""The recording file: its format, the streaming writer, the row reader, and `verify`."""
