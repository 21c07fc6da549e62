"""The trainer's one log line format."""


def log(msg: str) -> None:
    print(f"[kubetune] {msg}", flush=True)
