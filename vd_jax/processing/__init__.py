"""Turning raw inputs into model inputs and back: tokenizers and image preprocessing.

- `clip_tokenizer`: CLIP's BPE tokenizer from the bundled vocabulary (no hub).
- `optimus_tokenizers`: Optimus' BERT (encoder) and GPT-2 (decoder) tokenizers.
- `images`: CLIP image preprocessing, image loading and the unconditional images.
"""
