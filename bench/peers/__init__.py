"""What a user might compose the models with instead of the proxy, for ``make bench``'s "Peers":
Triton BLS (``iris_bls/``, ``wine_bls/``: Python-backend models the bench's Triton serves beside
``model_repository/``) and Ray Serve (``ray_serve.py``, run in its own environment). Nothing here
is imported by the bench itself: ``bench/peer_bench.py`` starts them."""
