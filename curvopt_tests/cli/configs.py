"""A TOML config written for the command line under test."""


def write_config(tmp_path, text: str, name: str = "cfg.toml") -> str:
    """``text`` saved as ``tmp_path / name``; its path as a string."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)
