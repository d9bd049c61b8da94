"""CPU demo of VD on synthetic captioned shapes: data, attribute readers, encoder pre-training."""
