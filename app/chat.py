"""The chat: one question about the loaded audio, answered as it is written (greedy and sampled
answers in the shared batch beside everyone else's, beam searches in line, one at a time), with the
LoRA scale and decoding it used under it; follow-ups, Regenerate, Stop, Clear, task presets."""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack

import gradio as gr

from model.errors import AudioError
from model.pipeline import Encoding

from . import presets
from .studio import session_of, warn

def messages(history: list[dict]) -> list[dict]:
    out = []
    for turn in history:
        out.append({"role": "user", "content": turn["q"]})
        out.append({"role": "assistant", "content": turn["shown"]})
    return out


def answer_footer(answer, gen) -> str:
    mode = f"beam search ({gen.num_beams})" if gen.num_beams > 1 else ("sampling" if gen.do_sample else "greedy")
    if gen.ctc_weight:
        mode += f", CTC-guided ({gen.ctc_weight:g})"
    bits = [f"LoRA scale {answer.lora_scale:g}", mode, f"{answer.num_tokens} tokens"]
    if "total_s" in answer.timings:
        bits.append(f"{answer.timings['total_s']:.2f} s")
    if answer.stopped:
        bits.append("stopped")
    return "*(" + " · ".join(bits) + ")*"


def audio_notes(enc: Encoding) -> str:
    """What the user should know about their audio (cut, clipped, scaled), under the answer."""
    return "".join(f"\n\n⚠️ {note}" for note in enc.audio.notes)


def skip(n: int = 4) -> tuple:
    return (gr.skip(),) * n


class Chat:
    """The chat's handlers (mixed into the studio)."""

    def respond(self, question, history, path, model_name, scale, beams, sample, temperature, top_p, top_k, rep,
                max_new, seed, ctc=0.0, clean=True, origin="file", request: gr.Request = None):
        """Stream one answer. Yields (chatbot, history, prompt box, prompt sent, details)."""
        history = list(history or [])
        question = str(question or "").strip()
        echo = question if len(question) <= 2000 else question[:2000] + " …"   # what the chat shows of it
        pipe = self.pipe_of(model_name)
        try:    # the pipeline's front door checks everything before the request waits for the model
            if not path:
                raise AudioError("Upload or record some audio first (or click one of the examples).")
            req = pipe.check_request(path, question, [(t["q"], t["a"]) for t in history], scale,
                                     self.gen_from(beams, sample, temperature, top_p, top_k, rep, max_new, seed, ctc, clean),
                                     origin)
        except Exception as err:  # noqa: BLE001
            text = warn(err)
            yield messages(history) + [{"role": "user", "content": echo},
                                       {"role": "assistant", "content": f"⚠️ {text}"}], history, *skip(3)
            return
        waiting = "…" if req.gen.num_beams == 1 else "… (beam search: words appear once every beam that could win agrees)"
        shown = messages(history) + [{"role": "user", "content": echo}, {"role": "assistant", "content": waiting}]
        yield shown, history, "", req.text, gr.skip()
        outcome: dict = {}
        yield from self._answer(pipe, req, shown, waiting, history, outcome, request)
        if "error" not in outcome:
            yield self._record(question, history, req, outcome)

    def _answer(self, pipe, req, shown: list[dict], waiting: str, history: list[dict], outcome: dict, request):
        """Wait for a place (beam search: in line; else in the shared batch), then stream the answer
        into `shown`; `outcome` gets the answer (None when stopped first), its text and the encoding."""
        stop = self.stops.start(session_of(request))
        outcome.update(answer=None, text="", enc=None)
        ticket, events, room = None, None, ExitStack()
        try:
            if req.gen.num_beams > 1:       # beam search runs alone: it waits its turn in the line
                ticket = self.gate.join()                   # Busy (a message) when the line is full
                for status in self.take_turn(stop, ticket):
                    shown[-1] = {"role": "assistant", "content": status}
                    yield shown, *skip()
            else:                           # answered in the shared batch, beside every other user's answer
                room.enter_context(pipe.reserve(1, self.gate.max_waiting))
            if stop.is_set():
                return
            shown[-1] = {"role": "assistant", "content": waiting}
            yield shown, *skip()
            outcome["enc"] = enc = pipe.encode(req.audio)
            events = pipe.stream_shared(dataclasses.replace(req, audio=enc), stop=stop)
            for ev in events:
                outcome["text"] = ev.text
                if ev.done:
                    outcome["answer"] = ev.answer
                    break
                shown[-1] = {"role": "assistant", "content": ev.text + " ▌"}
                yield shown, *skip()
        except Exception as err:  # noqa: BLE001
            msg, text = warn(err), outcome["text"]
            shown[-1] = {"role": "assistant", "content": (text + "\n\n" if text else "") + f"⚠️ {msg}"}
            outcome["error"] = True
            yield shown, history, *skip(3)
        finally:
            # Also runs when Gradio closes the stream (the client cancelled or went away): closing it
            # retires the answer at the next step, and the next in line gets its turn.
            if events is not None:
                events.close()
            if ticket is not None:
                self.gate.leave(ticket)
            room.close()
            self.stops.finish(session_of(request), stop)

    def _record(self, question: str, history: list[dict], req, outcome: dict) -> tuple:
        """The finished turn added to the history, with its footer and details."""
        answer, enc = outcome["answer"], outcome["enc"]
        if answer is None:   # stopped before the model delivered its final answer
            footer = f"*(LoRA scale {req.scale:g} · stopped)*"
            details = {"lora_scale": req.scale, "stopped": True, "prompt": req.text}
            final, sent = outcome["text"], req.text
        else:
            footer = answer_footer(answer, req.gen)
            gen = dict(req.gen.__dict__)
            gen["blocked_words"] = len(gen.pop("bad_words"))      # a count: the list itself is not for display
            details = {"lora_scale": answer.lora_scale, "num_tokens": answer.num_tokens, "stopped": answer.stopped,
                       "timings": answer.timings, "generate": gen}
            final, sent = answer.text, answer.prompt
        if enc is not None:
            footer += audio_notes(enc)
            details["audio"] = enc.audio.describe()
        history.append({"q": question, "a": final, "shown": f"{final or '*(empty answer)*'}\n\n{footer}",
                        "scale": details["lora_scale"]})
        return messages(history), history, gr.skip(), sent, details

    def regenerate(self, history, path, model_name, scale, beams, sample, temperature, top_p, top_k, rep, max_new,
                   seed, ctc=0.0, clean=True, origin="file", request: gr.Request = None):
        """Ask the last question again (with the current settings), replacing its answer."""
        history = list(history or [])
        if not history:
            gr.Warning("Nothing to regenerate yet: ask a question first.")
            yield skip(5)
            return
        last = history.pop()
        yield from self.respond(last["q"], history, path, model_name, scale, beams, sample, temperature, top_p, top_k,
                                rep, max_new, seed, ctc, clean, origin, request)

    @staticmethod
    def clear_chat():
        return [], [], "", None

    @staticmethod
    def apply_preset(label):
        preset = presets.PRESETS_BY_LABEL.get(label)
        if preset is None:
            return gr.skip(), ""
        return preset.prompt, preset.note

    def suggested_settings(self, label):
        preset = presets.PRESETS_BY_LABEL.get(label)
        scale, beams, ctc = preset.suggested(self.trained) if preset else (round(self.trained, 1), 1, 0.0)
        return scale, beams, ctc if self.guidable else 0.0
