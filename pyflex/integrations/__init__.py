"""What connects pyflex to the ecosystem: the HF Trainer callback (trainer.py), pyflex and PEFT adapter files
(adapter_files.py), liger-kernel's fused ops (liger.py). Each is imported only when used."""
