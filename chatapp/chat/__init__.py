"""Conversations, messages and the bots that answer them."""
