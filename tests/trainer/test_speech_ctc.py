"""wav2vec 2.0 CTC after audioPretrain at full length: the issue's bar (held-out WER <= 0.5 on unseen voice/speed
pairs). A file of its own so that `make unit`'s
workers run it beside the Whisper tests (tests/conftest.py groups the files that use the session's Whisper)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_helpers import SPEECH_HP, Trainer, report

# The bar at full length, on the session's spoken set (400 unlabelled clips to pretrain on, 400 transcribed,
# 96 held out from unseen voice/speed pairs), 64 wide as examples/speech-tiny.yaml: 100 audioPretrain steps, then
# CTC_STEPS of CTC with the feature encoder trained too. Held-out WER after CTC (from 1.24 before it), measured one
# torch thread at a time on 2026-12-03: 1000 steps 0.496 (learning rate 2e-3; the test's length until then, 0.374
# when it was set on 2026-11-30), 0.469 (3e-3); 1500 steps 0.409 (2e-3, the test's), 0.461
# (3e-3); 200 pretraining steps and 1200 of CTC 0.528. The character error rate is 0.16-0.21 in all of them: most
# words missed are misspelt by a letter ("sivn", "foure"), so WER moves by a few words between runs, and the bar sits
# near what this model reaches. A randomly initialised encoder reached 0.291 in 1000 steps on 2026-11-30: at this
# scale (0.1 hours of unlabelled speech) pretraining does not help. That comparison ran beside this test until
# 2026-12-03 and is left out since, as it proved nothing the bar does not.
SPEECH_W2V = {"architecture": "wav2vec2", "hiddenSize": 64, "numLayers": 2, "numHeads": 4}
CTC_STEPS = 1500


@pytest.mark.slow
def test_ctc_after_audio_pretrain_transcribes_held_out_speakers(spoken: dict[str, Path], tmp_path: Path) -> None:
    trainer = Trainer(spoken, tmp_path)
    hp = {**SPEECH_HP, "learningRate": 2e-3}
    pretrain = trainer.stage_run("pretrain", "audioPretrain", "audio", "speech", init=SPEECH_W2V,
                                 hp={**hp, "maxSteps": 100},
                                 audioPretrain={"numNegatives": 20, "gumbelTemperatureDecay": 0.5 ** (1 / 25)})
    pretrained = trainer.train(pretrain)
    assert pretrained["after"]["evalLoss"] < pretrained["before"]["evalLoss"]
    run = trainer.stage_run("ctc", "asr", "audioTranscript", "asr", model=pretrain["outputUri"],
                            hp={**hp, "maxSteps": CTC_STEPS}, asr={"freezeFeatureEncoder": False})
    ctc = trainer.train(run)
    report(f"asr CTC from the pretrained encoder ({CTC_STEPS} steps)", ctc)
    assert ctc["before"]["wordErrorRate"] >= 0.9 and ctc["after"]["wordErrorRate"] <= 0.5
    assert ctc["sample"]["frozenFeatureEncoder"] is False
