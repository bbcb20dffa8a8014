"""State-space core (owned by the ssm work)."""


def available_backends() -> dict[str, bool]:
    return {"reference": True}
