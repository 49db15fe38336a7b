"""The bench cases; each is ``async def run(ctx) -> list[Result]`` for one backend."""
