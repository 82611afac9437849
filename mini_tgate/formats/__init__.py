"""The formats people bring: hub sources and hashes, single files, LoRA, PNG parameters, saving."""
