"""Engine hooks for the deep stage, all through vLLM's own extension points:

* ``kv.py``        a KV-cache spec for the layers above the merge point and its manager,
                   registered with ``KVCacheSpecRegistry``: the deep group holds blocks
                   for the COMPACTED sequence only;
* ``scheduler.py`` a ``--scheduler-cls`` that lets the deep manager see requests;
* ``runner.py``    a model-runner mixin (installed by ``worker.py``, a ``--worker-cls``)
                   giving the deep layers compacted slot mappings and attention metadata;
* ``config_hook.py`` the per-architecture config hook that turns all of this on (and
                   turns prefix caching / chunked audio / torch.compile off) when the
                   SPEC has a deep stage.
"""
