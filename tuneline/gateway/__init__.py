"""The serving gateway (`tuneline gateway`): champion, A/B challenger, traces and feedback.

app.py (FastAPI app), routing.py (registry aliases, TTL cache), ab.py (sticky assignment),
upstream.py (shared async openai clients), tracing.py (async trace export), feedback.py (durable spool),
echo.py (a canned OpenAI-compatible upstream for tests, benchmarks and demos).
"""
