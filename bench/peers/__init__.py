"""Peer servers for the speed benchmark: the same model and preprocessing behind other serving designs.

- `plain_fastapi`: one model call per request, no batching (what a first FastAPI deployment looks like);
- `litserve_peer`: LitServe with dynamic batching at our max batch size and batch timeout, no adaptation.

Both take the same multipart `files` POST as the TTA server, so `bench.load` drives all of them unchanged.

And for the accuracy benchmark, `anchors`: the published TTA methods (EATA, ROID, RoTTA, SAR, TENT, BN, LAME, CoTTA)
run from their own code in ../shared/anchors on our model and our stream (`python -m bench.stream --methods ...`).
"""
