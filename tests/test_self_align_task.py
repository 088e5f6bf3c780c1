"""SelfAlignTask's per-row pipelining, on a scripted engine whose requests end when the test
says: a row's answer starts while other rows are still thinking, and the tables are the same
as phases run in lockstep."""

import threading
from concurrent.futures import Future

import pyarrow as pa

from dromedary_ray.config import SelfAlignConfig
from dromedary_ray.data.schemas import PromptRow, RejectRow, SelfAlignRow
from dromedary_ray.engines.base import Completion, Generation
from dromedary_ray.stages.self_align import SelfAlignTask, stage_principles


class PlainTokenizer:
    chat_template = None


ANSWER = "Water boils at one hundred degrees Celsius at sea level, and lower on a mountain."


def generation(text: str, finish: str = "stop") -> Generation:
    return Generation(10, [Completion(text, [1] * len(text.split()), [-0.5], finish)])


def scripted(doc: str, max_tokens: int) -> Generation:
    """Thoughts for phase 1 (row "q2" runs away), an answer for phase 2."""
    if is_answer(doc):
        return generation(ANSWER)
    if "q2" in doc:
        return generation("I think and think", "length")
    return generation("I should apply rule 3 and answer plainly.")


class HeldEngine:
    """`submit` returns pending futures; `release(n)` finishes the n oldest requests."""

    def __init__(self):
        self.pending: list[tuple[Future, str, int]] = []
        self.log: list[str] = []  # "submit:<query>:<phase>" and "done:<query>:<phase>"
        self.lock = threading.Condition()

    def submit(self, prompts, sampling, seeds):
        futures = []
        with self.lock:
            for p in prompts:
                f: Future = Future()
                self.pending.append((f, p, sampling.max_new_tokens))
                self.log.append(f"submit:{tag(p)}")
                futures.append(f)
            self.lock.notify_all()
        return futures

    def release(self, n: int) -> None:
        for _ in range(n):
            with self.lock:
                self.lock.wait_for(lambda: self.pending, timeout=5)
                f, doc, max_tokens = self.pending.pop(0)
                self.log.append(f"done:{tag(doc)}")
            f.set_result(scripted(doc, max_tokens))


def tag(doc: str) -> str:
    query = doc.split("### User\n")[-1].split("\n")[0]
    phase = "answer" if is_answer(doc) else "thoughts"
    return f"{query}:{phase}"


def is_answer(doc: str) -> bool:
    return doc.endswith("</thoughts>\n")


def batch() -> pa.Table:
    return PromptRow.to_table([PromptRow(f"id{i}", "seed", f"q{i}") for i in range(3)])


def task() -> SelfAlignTask:
    cfg = SelfAlignConfig(min_answer_words=3)
    return SelfAlignTask(PlainTokenizer(), cfg, stage_principles(cfg))


def test_a_row_answers_while_the_others_still_think():
    engine, t = HeldEngine(), task()
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(result=t.process(engine, batch())))
    worker.start()
    engine.release(1)  # q0's thoughts end; q1's and q2's are still being decoded
    with engine.lock:  # q0 goes on to its answer without waiting for the rest of its batch
        assert engine.lock.wait_for(lambda: "submit:q0:answer" in engine.log, timeout=5)
    assert "done:q1:thoughts" not in engine.log
    engine.release(2)  # q1 and q2 think (q2 runs away: no answer)
    engine.release(2)  # both answers
    worker.join(5)
    result = out["result"]
    assert [r.id for r in SelfAlignRow.from_table(result.kept)] == ["id0", "id1"]
    assert [(r.id, r.reason) for r in RejectRow.from_table(result.rejects)] == [
        ("id2", "thoughts_runaway")]


def test_pipelined_tables_equal_lockstep_phases():
    class Immediate:
        def submit(self, prompts, sampling, seeds):
            futures = []
            for p in prompts:
                f: Future = Future()
                f.set_result(scripted(p, sampling.max_new_tokens))
                futures.append(f)
            return futures

    t, rows = task(), batch()
    pipelined = t.process(Immediate(), rows)
    prompts = PromptRow.from_table(rows)
    docs = t.documents(prompts)
    thoughts = {i: scripted(d, 0) for i, d in enumerate(docs)}
    answers = {i: scripted(t.answer_document(docs[i], g), 0) for i, g in thoughts.items()
               if t.continues(g)}
    lockstep = t.tables(prompts, thoughts, answers)
    assert pipelined.kept.equals(lockstep.kept) and pipelined.rejects.equals(lockstep.rejects)
    assert pipelined.completion_tokens == lockstep.completion_tokens > 0
