"""The device's hardware: where keys live (file, TPM 2.0), atomic storage, boot slots for OTA."""
