"""The page of `cifar10 serve` in a real headless Chromium (Debian's): pictures picked, pasted and from a
camera get their classes as bars, bad files get the server's message, nothing is fetched from elsewhere,
and it fits a phone's screen. Screenshots are kept in tests/artifacts/."""
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
from conftest import CHROMIUM_FLAGS, cifar10_server
from playwright.sync_api import TimeoutError as PageTimeout

from cifar10.data import CLASSES

ARTIFACTS = Path(__file__).parent/'artifacts'
# every test here drives a real browser against a server on a freshly trained model
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def page_server(trained):
    "`cifar10 serve` on the trained model's ONNX export (OpenVINO): its URL."
    models, run = trained
    with cifar10_server('--checkpoint_name', run, '--models_dir', models, '--backend', 'openvino',
                        log=models.parent/'page-server.log') as (_, url):
        yield url


def offline_page(browser, url, **context):
    """A page of `browser` on `url`, and the addresses it asked for elsewhere than `url`'s server. Chromium resolves
    no host name but the loopback's (CHROMIUM_FLAGS), so such a request fails; requests are watched, not intercepted,
    so the page's uploads reach the server as the browser sends them."""
    page, elsewhere = browser.new_context(**context).new_page(), []
    def note(request):
        if not request.url.startswith((url, 'blob:', 'data:')): elsewhere.append(request.url)
    page.on('request', note)
    page.goto(url)
    return page, elsewhere


def test_a_fetch_elsewhere_fails_and_is_seen(browser, page_server):
    page, elsewhere = offline_page(browser, page_server)
    outcome = page.evaluate("fetch('https://example.com/font.woff2').then(() => 'answered', () => 'failed')")
    assert outcome == 'failed'
    page.wait_for_timeout(500)  # for the request's event to reach Python
    assert elsewhere == ['https://example.com/font.woff2']


def answers(page, count: int) -> dict:
    "Once `count` pictures on `page` have their answers: each one's name, and its three classes or its error."
    try:
        page.wait_for_function(f'document.querySelectorAll("#results .result").length === {count} && '
                               '!document.querySelector("#results .pending")', timeout=60_000)
    except PageTimeout:
        raise AssertionError(f'the page, a minute after {count} pictures: {page.inner_text("#results")!r}') from None
    shown = {}
    for result in page.locator('#results .result').all():
        name, error = result.locator('.name').inner_text(), result.locator('.error')
        shown[name] = error.inner_text() if error.count() else result.locator('.bars .label').all_inner_texts()
    return shown


def top_class(url: str, body: bytes) -> str:
    "The top class that `/predict` gives a PNG picture."
    request = urllib.request.Request(f'{url}/predict', body, {'Content-Type': 'image/png'})
    with urllib.request.urlopen(request, timeout=30) as r: answer = json.loads(r.read())
    return answer['predictions'][0]['top_k'][0]['class']


def test_page_classifies_picked_pictures_and_shows_the_servers_errors(browser, page_server, picture, tmp_path):
    page, elsewhere = offline_page(browser, page_server, viewport={'width': 1100, 'height': 760})
    page.wait_for_selector('#model:has-text("classes")')  # the model's description, from /info
    files = []
    for i in range(6):
        files.append(tmp_path/f'test-{i}.png'); files[-1].write_bytes(picture(i, (96, 96)))
    page.set_input_files('#files', [str(f) for f in files])
    shown = answers(page, len(files))
    for f in files:
        labels = shown[f.name]
        assert isinstance(labels, list), labels  # the server's error, if not the classes
        assert len(labels) == 3
        assert set(labels) <= set(CLASSES) and labels[0] == top_class(page_server, f.read_bytes()), labels
    (tmp_path/'notes.png').write_text('not a picture at all')
    page.set_input_files('#files', str(tmp_path/'notes.png'))
    error = page.locator('.result', has_text='notes.png').locator('.error')
    error.wait_for(timeout=60_000)
    assert error.inner_text() == '400: body: not an image Pillow can read'
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS/'page.png'))
    assert elsewhere == []


def test_page_takes_a_pasted_picture_and_reports_one_too_large(browser, page_server):
    page, _ = offline_page(browser, page_server)
    paste = '''async ([width, height, name]) => {
        const canvas = Object.assign(document.createElement('canvas'), {width, height});
        const context = canvas.getContext('2d');
        context.fillStyle = '#c33'; context.fillRect(0, 0, width, height);
        const blob = await new Promise((done) => canvas.toBlob(done, 'image/png'));
        const clipboard = new DataTransfer();
        clipboard.items.add(new File([blob], name, {type: 'image/png'}));
        window.dispatchEvent(new ClipboardEvent('paste', {clipboardData: clipboard}));
    }'''
    page.evaluate(paste, [64, 48, 'pasted.png'])
    page.locator('.result', has_text='pasted.png').locator('.bars li').first.wait_for(timeout=60_000)
    page.evaluate(paste, [8000, 6000, 'huge.png'])  # 48 megapixels: more than the server decodes
    error = page.locator('.result', has_text='huge.png').locator('.error')
    error.wait_for(timeout=60_000)
    assert error.inner_text().startswith('413: body: 8000×6000 is more than the 40,000,000 pixels allowed')


def test_page_classifies_camera_frames_while_the_camera_is_on(browser, page_server):
    camera = browser.browser_type.launch(executable_path=shutil.which('chromium'),
                                         args=[*CHROMIUM_FLAGS, '--use-fake-device-for-media-stream',
                                               '--use-fake-ui-for-media-stream'])  # a test pattern as the camera
    try:
        page, _ = offline_page(camera, page_server)
        frames = []
        page.on('request', lambda r: frames.append(r) if r.url.endswith('/predict') else None)
        page.click('#camera')
        page.locator('#live-bars li').first.wait_for(timeout=60_000)
        page.wait_for_function('document.querySelectorAll("#live-bars li").length === 3')
        page.wait_for_timeout(1500)
        assert len(frames) >= 3, len(frames)  # a frame every few hundred ms
        assert set(page.locator('#live-bars .label').all_inner_texts()) <= set(CLASSES)
        page.click('#camera')
        stopped = len(frames)
        page.wait_for_timeout(1000)
        assert page.locator('#live').is_hidden() and len(frames) <= stopped + 1
    finally: camera.close()


def test_page_fits_a_phone_screen(browser, page_server, picture, tmp_path):
    page, _ = offline_page(browser, page_server, viewport={'width': 390, 'height': 844}, is_mobile=True,
                           device_scale_factor=2, has_touch=True)
    (tmp_path/'one.png').write_bytes(picture(7, (64, 64)))
    page.set_input_files('#files', str(tmp_path/'one.png'))
    page.locator('.result .bars li').first.wait_for(timeout=60_000)
    assert page.evaluate('document.documentElement.scrollWidth') <= 390  # nothing sticks out sideways
    width = page.locator('#results .result').bounding_box()['width']
    assert 300 < width <= 390, width
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS/'page-phone.png'))


def test_docs_render_offline_with_a_file_picker_for_predict(browser, page_server):
    page, elsewhere = offline_page(browser, page_server, viewport={'width': 1100, 'height': 900})
    page.goto(f'{page_server}/docs')
    operation = page.locator('#operations-default-predict_predict_post')
    operation.wait_for(timeout=60_000)
    operation.locator('.opblock-summary').click()
    page.locator('.try-out__btn').click()
    page.locator('select.content-type, .body-param-content-type select').first.select_option('multipart/form-data')
    page.locator('input[type=file]').first.wait_for(timeout=10_000)
    assert elsewhere == []
