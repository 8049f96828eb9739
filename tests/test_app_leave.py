"""A visitor who closes the page mid-turn: the agent's turn stops, and with it the model's generation, instead of
running on unseen until the step limit (Gradio keeps a closed page's state for an hour)."""

import threading

import pytest
from playwright.sync_api import expect

from mcpft.serve import Generation, GenerationRequest
from tests.test_app import chromium_page, tiny_app


class EndlessBackend:
    """A model that thinks aloud until it is cancelled; `cancelled` is set when that happens."""

    def __init__(self):
        self.cancelled = threading.Event()
        self.started = threading.Event()

    def start(self, request: GenerationRequest) -> Generation:
        def chunks():
            self.started.set()
            yield "<think>"
            while not self.cancelled.wait(0.05):  # paced, so that a client's departure is seen between chunks
                yield "still thinking "

        return Generation(chunks=chunks(), cancel=self.cancelled.set)


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    backend = EndlessBackend()
    with tiny_app(tmp_path_factory.mktemp("home"), tiny_model_dir, {"endless": backend}) as (_, url):
        yield backend, url


def test_closing_the_page_mid_turn_stops_the_generation(app):
    backend, url = app
    with chromium_page(url) as page:
        expect(page.locator("#embedded-status")).to_contain_text("ready")
        model = page.locator("#endpoint-model input")
        model.fill("endless")
        model.press("Enter")
        page.get_by_role("tab", name="Agent").click()
        page.locator("#agent-input textarea").fill("think about it")
        page.locator("#agent-send").click()
        expect(page.locator("#agent-chat")).to_contain_text("still thinking")
        page.close()
        assert not backend.cancelled.is_set()
        assert backend.cancelled.wait(timeout=60), "the model went on generating after the page was closed"
