"""What touches the user's files and terminal: video in/out, the official YAML configs, the CLI,
its staged output folder and its run.json."""
