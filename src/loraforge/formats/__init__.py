"""Adapter files in the ecosystem's formats: PEFT (text models), diffusers and kohya (image models)."""
