"""The `dsclip` console commands, one module each (train is dsclip/train.py, where the DeepSpeed
launcher finds it). A command parses its flags, sets up logging, checks its inputs, and only then
imports what does the work."""
