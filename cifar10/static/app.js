// The page of `cifar10 serve`: pictures from files, the clipboard or the camera, each sent to POST /predict as its
// own request; the answer's classes are drawn as bars, an error as the server's message. Nothing is loaded from
// anywhere but this server.
'use strict';
const $ = (id) => document.getElementById(id);
const results = $('results'), message = $('message');
const CAMERA_INTERVAL_MS = 300;  // a camera frame is classified this often, at most (one request at a time)
const PARALLEL_UPLOADS = 4;  // requests in flight at once when many files arrive together

function showMessage(text) { message.textContent = text; message.hidden = !text; }

function describe(info) {
  const m = info.model;
  $('model').textContent = `${m.model.arch} of width ${m.model.width} on ${info.backend}, ` +
    `${m.classes.length} classes: ${m.classes.join(', ')}`;
}

// POST one picture; resolves to {top_k} or {error}, whatever went wrong.
async function classify(blob) {
  try {
    const response = await fetch('/predict', {method: 'POST', body: blob,
                                              headers: {'Content-Type': blob.type || 'application/octet-stream'}});
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) return {error: `${response.status}: ${answer.detail || response.statusText}`};
    return {top_k: answer.predictions[0].top_k};
  } catch (e) {
    return {error: `the server did not answer (${e.message})`};
  }
}

function drawBars(list, topK) {
  list.replaceChildren(...topK.map(({class: name, probability}) => {
    const item = document.createElement('li');
    item.dataset.class = name;
    item.innerHTML = '<span class="label"></span><span class="bar"><span></span></span><span class="value"></span>';
    item.querySelector('.label').textContent = name;
    item.querySelector('.bar span').style.width = `${(probability * 100).toFixed(1)}%`;
    item.querySelector('.value').textContent = `${(probability * 100).toFixed(probability < 0.1 ? 1 : 0)}%`;
    return item;
  }));
}

function addResult(blob, name) {
  const item = document.createElement('li');
  item.className = 'result';
  item.innerHTML = '<img alt=""><div><p class="name"></p><p class="pending">classifying…</p></div>';
  item.querySelector('img').src = URL.createObjectURL(blob);
  item.querySelector('img').onerror = (event) => { event.target.style.visibility = 'hidden'; };
  item.querySelector('.name').textContent = name;
  results.prepend(item);
  $('clear').hidden = false;
  return item;
}

function showAnswer(item, answer) {
  const body = item.querySelector('div'), status = body.querySelector('.pending');
  if (answer.error) {
    const error = document.createElement('p');
    error.className = 'error';
    error.textContent = answer.error;
    status.replaceWith(error);
  } else {
    const list = document.createElement('ul');
    list.className = 'bars';
    drawBars(list, answer.top_k);
    status.replaceWith(list);
  }
}

async function classifyAll(files) {
  const queue = [...files].map((file) => [file, addResult(file, file.name || 'pasted picture')]);
  showMessage('');
  const work = async () => {
    for (let next = queue.shift(); next; next = queue.shift()) showAnswer(next[1], await classify(next[0]));
  };
  await Promise.all(Array.from({length: PARALLEL_UPLOADS}, work));
}

$('files').addEventListener('change', (event) => { classifyAll(event.target.files); event.target.value = ''; });
$('clear').addEventListener('click', () => { results.replaceChildren(); $('clear').hidden = true; });

const drop = $('drop');
for (const kind of ['dragenter', 'dragover']) {
  window.addEventListener(kind, (event) => { event.preventDefault(); drop.classList.add('over'); });
}
window.addEventListener('dragleave', (event) => { if (!event.relatedTarget) drop.classList.remove('over'); });
window.addEventListener('drop', (event) => {
  event.preventDefault();
  drop.classList.remove('over');
  if (event.dataTransfer.files.length) classifyAll(event.dataTransfer.files);
});
window.addEventListener('paste', (event) => {
  const pictures = [...event.clipboardData.items].filter((i) => i.kind === 'file').map((i) => i.getAsFile());
  if (pictures.length) classifyAll(pictures);
  else showMessage('The clipboard holds no picture: copy an image, then paste it here.');
});

// The camera: a frame every CAMERA_INTERVAL_MS while it is on, drawn into a canvas and sent as a JPEG.
const camera = {stream: null, timer: null, busy: false};
async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showMessage('This browser gives no camera to this page (it needs http://localhost or https).');
    return;
  }
  try {
    camera.stream = await navigator.mediaDevices.getUserMedia({video: {facingMode: 'environment'}, audio: false});
  } catch (e) {
    showMessage(`No camera: ${e.message}`);
    return;
  }
  const video = $('video');
  video.srcObject = camera.stream;
  await video.play();
  $('live').hidden = false;
  $('camera').textContent = 'Stop camera';
  const canvas = document.createElement('canvas');
  camera.timer = setInterval(() => {
    if (camera.busy || !video.videoWidth) return;
    camera.busy = true;
    const side = Math.min(video.videoWidth, video.videoHeight);  // the centred square, as the server takes it
    canvas.width = canvas.height = Math.min(side, 256);
    canvas.getContext('2d').drawImage(video, (video.videoWidth - side) / 2, (video.videoHeight - side) / 2, side,
                                      side, 0, 0, canvas.width, canvas.height);
    canvas.toBlob(async (frame) => {
      const answer = await classify(frame);
      camera.busy = false;
      if (answer.error) showMessage(answer.error); else drawBars($('live-bars'), answer.top_k);
    }, 'image/jpeg', 0.9);
  }, CAMERA_INTERVAL_MS);
}
function stopCamera() {
  clearInterval(camera.timer);
  camera.stream.getTracks().forEach((track) => track.stop());
  camera.stream = null;
  $('live').hidden = true;
  $('camera').textContent = 'Start camera';
}
$('camera').addEventListener('click', () => (camera.stream ? stopCamera() : startCamera()));

fetch('/info').then((r) => r.json()).then(describe).catch(() => {});
