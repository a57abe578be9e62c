"""Settings, one class per concern, and loading them from env, YAML and flags."""
