"""What other teams read: the input and scored events, the JSON codec, the dead-letter
header format, and the protocol a scorer implements."""
