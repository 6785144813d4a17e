"""The script that runs a LitGPT checkpoint in a Python that has LitGPT (formats/litgpt/runtime.py
starts it); a folder of its own, so nothing beside it can shadow a module LitGPT imports."""
