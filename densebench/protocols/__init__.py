"""The four evaluation protocols. Each module reads as its recipe:

* ``Config``: a frozen dataclass whose defaults are the published protocol, every field declared with
  :func:`densebench.options.option` (choices, range, help, whether it changes the numbers);
* ``prepare(ctx)``: open the data and resolve automatic settings; everything that can be refused is
  refused here, before any forward runs;
* ``extract_features(ctx, prepared)``: the backbone forwards, through the feature cache;
* ``score(ctx, prepared, features) -> Outcome``: everything after the forward pass;
* ``run(...)``: :func:`densebench.protocols.common.run_protocol` over those three steps;
* ``resolve_canonical(config, model)``: the published config as a run of ``model`` records it.

Which benchmark runs which protocol on which dataset is in :mod:`densebench.benchmarks`.
"""
