"""Chaos: real processes SIGKILLed under traffic, webhooks failing; nothing may be lost."""
