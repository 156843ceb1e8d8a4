"""A base class for a mypyc-compiled class that something holds weakly (kept out of the compiled modules).

A compiled (native) class has no `__weakref__` slot; one that derives from a plain Python class gets `__dict__` and
`__weakref__` while its own attributes stay native. `RetentionPolicy` needs it: the session routes key their owner
index by the policy in a `WeakKeyDictionary` (kvsched/adapters/vllm/session_admin.py).
"""


class Weakrefable:
    """Nothing but weak-reference support for a compiled subclass (kvsched/compiled.py)."""
