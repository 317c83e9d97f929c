"""The Serve deployments' adaptive batch window (no Ray needed)."""


def test_adaptive_batch_wait_opens_only_under_concurrency():
    from serve_app.batchwait import AdaptiveWait

    class Handler:
        def set_batch_wait_timeout_s(self, s):
            self.s = s

    h = Handler()
    w = AdaptiveWait(h, 0.1)
    w.arrive()
    assert h.s == 0.0  # a lone request does not wait for company
    w.arrive()
    assert h.s == 0.1  # another request is in flight here: the window opens
    w.leave()
    w.leave()
    w.arrive(concurrent=True)
    assert h.s == 0.1  # the ingress is serving others: they are on their way
    w.leave()
    fixed = AdaptiveWait(h, 0.1, adaptive=False)
    fixed.arrive()
    assert h.s == 0.1
