// The captioning page: one image, one field. Enter saves and shows the next uncaptioned image,
// Esc saves and ends the session, Alt+arrows (or PageUp/PageDown) move to edit other captions.
// Every save goes to the server at once, which rewrites index.csv before it answers.

const token = document.querySelector('meta[name="clipforge-token"]').content;
const $ = (id) => document.getElementById(id);
const field = $('caption');

let images = [];
let at = 0;
let busy = false;
let total = 0;

function hint(text, kind = '') {
  $('hint').textContent = text;
  $('hint').className = `hint ${kind}`;
}

function count(captioned, all) {
  total = all;
  $('counter').textContent = `${captioned} / ${all} captioned`;
}

async function post(path, body) {
  let response;
  try {
    response = await fetch(path, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-clipforge-token': token },
      body: JSON.stringify(body),
    });
  } catch {
    throw new Error('The server cannot be reached. Captions saved so far are in index.csv; '
      + 'run clipforge caption again to go on.');
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw Object.assign(new Error(data.error || `The server answered ${response.status}.`),
      { status: response.status, answer: data });
  }
  return data;
}

// A save names the caption it replaces. If another tab or an editor changed it meanwhile, the server
// refuses (409) and says what is there now: that becomes what the next save replaces, so saving again
// is a decision made after seeing it. The other captions are read again too, so the images offered
// next are those that have none on disk.
async function saveCaption(path, body) {
  const item = images[at];
  try {
    return await post(path, { ...body, replaces: item.caption });
  } catch (problem) {
    if (problem.status === 409) {
      await load().catch(() => {});
      const index = images.findIndex((image) => image.path === item.path);
      if (index >= 0) at = index; // the typing stays in the field, on the same image
      else images.splice(at, 0, item);
      images[at].caption = problem.answer.caption;
      images[at].conflict = 'refused';
    }
    throw problem;
  }
}

function imageUrl(path) {
  return `image/${path.split('/').map(encodeURIComponent).join('/')}`;
}

function show(index) {
  if (images[at]) images[at].conflict = null; // a refused save holds only while its image is shown
  at = index;
  const item = images[at];
  $('image').src = imageUrl(item.path);
  $('image').alt = item.path;
  $('path').textContent = item.path;
  $('position').textContent = `image ${at + 1} of ${images.length}`;
  field.value = item.caption;
  showOthers(item.others ?? []);
  field.focus();
  hint('');
  const next = images[at + 1];
  if (next) new Image().src = imageUrl(next.path); // the next image is usually the one shown next
}

// An image with several rows in index.csv (COCO style): the field edits the first, the others are shown
// as they are, so a save is never taken to change or drop them.
function showOthers(others) {
  const quoted = others.map((text) => `“${text}”`).join(' · ');
  $('others').hidden = !others.length;
  $('others').textContent = others.length ? `${others.length} more caption${others.length === 1 ? '' : 's'} `
    + `in index.csv, kept as they are (the field edits the first): ${quoted}` : '';
}

function nextUncaptioned(from) {
  for (let step = 1; step <= images.length; step += 1) {
    const index = (from + step) % images.length;
    if (!images[index].caption.trim()) return index;
  }
  return -1;
}

async function save(text) {
  const item = images[at];
  if (text === item.caption) return;
  const data = await saveCaption('api/caption', { path: item.path, caption: text });
  item.caption = data.caption;
  item.conflict = null;
  count(data.captioned, data.total);
}

// After a refused save the field still holds this person's caption, and the other one is on disk. Only
// Enter (or Save) puts this one over it: leaving the image (moving on, Esc) says so first, and the same
// key again leaves the image with the caption on disk. Returns 'save', 'wait' (said why) or 'leave'.
function afterConflict(text, again) {
  const item = images[at];
  if (!item?.conflict || !text || text === item.caption) return 'save';
  if (item.conflict !== again) { // refused, or said for another key
    item.conflict = again;
    const onDisk = item.caption ? `“${item.caption}”` : 'no caption';
    hint(`Not saved: ${item.path} has ${onDisk} from elsewhere. Enter replaces it with yours; ${again} `
      + 'leaves it as it is.', 'warn');
    return 'wait';
  }
  item.conflict = null;
  return 'leave';
}

// One action at a time: a held-down Enter must not save twice or skip images.
async function exclusive(action) {
  if (busy) return;
  busy = true;
  try {
    await action();
  } catch (problem) {
    hint(problem.message, 'error');
  } finally {
    busy = false;
  }
}

function allCaptioned() {
  hint(`All ${total} images are captioned. Esc ends the session; Alt+←/→ to review.`, 'ok');
}

async function enter() {
  const text = field.value.trim();
  if (!text) {
    hint('Type a caption first: an empty caption is not saved.', 'warn');
    return;
  }
  const typed = field.value;
  await save(text);
  // What was typed while the save was on its way (over a slow port-forward, say) starts the next caption.
  const ahead = field.value.startsWith(typed) ? field.value.slice(typed.length).trimStart() : '';
  const next = nextUncaptioned(at);
  if (next >= 0) {
    show(next);
  } else {
    if (at + 1 < images.length) show(at + 1);
    allCaptioned();
  }
  if (ahead && !field.value) field.value = ahead;
}

async function move(step) {
  const target = at + step;
  if (target < 0 || target >= images.length) {
    hint(step < 0 ? 'This is the first image.' : 'This is the last image.');
    return;
  }
  const text = field.value.trim();
  const choice = afterConflict(text, 'moving again');
  if (choice === 'wait') return;
  if (text && choice === 'save') await save(text); // what is typed is kept, as Enter would
  show(target);
}

async function finish() {
  const item = images[at];
  const text = field.value.trim();
  const choice = afterConflict(text, 'Esc again');
  if (choice === 'wait') return;
  const data = item && text && text !== item.caption && choice === 'save' // no item: no image left to save to
    ? await saveCaption('api/finish', { path: item.path, caption: text }) : await post('api/finish', {});
  $('session').hidden = true;
  $('done').hidden = false;
  $('done-summary').textContent = `${data.captioned} / ${data.total} images captioned, saved in ${data.index}.`;
  count(data.captioned, data.total);
}

function isMoveKey(event) {
  return (event.altKey && (event.key === 'ArrowLeft' || event.key === 'ArrowRight'))
    || event.key === 'PageUp' || event.key === 'PageDown';
}

function onKey(event) {
  if (event.isComposing) return; // an input method is still composing the text
  const moveKey = isMoveKey(event);
  if (event.key === 'Enter') {
    event.preventDefault();
    exclusive(enter);
  } else if (event.key === 'Escape') {
    event.preventDefault();
    exclusive(finish);
  } else if (moveKey) {
    event.preventDefault();
    exclusive(() => move(event.key === 'ArrowLeft' || event.key === 'PageUp' ? -1 : 1));
  }
}

field.addEventListener('keydown', onKey);
// A click elsewhere (the header, the image) takes the focus from the field: the keys still work, and
// typing goes back to the field. Keys aimed at another control (the list of unreadable images, a link)
// act there: Enter on it opens it, and never saves a caption half typed. Esc and the moving keys, which no
// control uses, keep their meaning there.
const CONTROLS = 'summary, button, a[href], input, select, textarea, [tabindex]';
document.addEventListener('keydown', (event) => {
  if (event.target === field || field.disabled || $('session').hidden) return;
  const onControl = event.target instanceof Element && event.target.closest(CONTROLS);
  if (onControl && event.key !== 'Escape' && !isMoveKey(event)) return;
  field.focus();
  onKey(event);
});
$('form').addEventListener('submit', (event) => event.preventDefault());
// The server says why it sends no image: gone since the start (404), or its pixels do not decode (422):
// then it is skipped, as the unreadable images are, and the next image without a caption is shown.
$('image').addEventListener('error', async () => {
  const src = $('image').getAttribute('src');
  if (!src) return;
  const response = await fetch(src).catch(() => null);
  if (!response) {
    hint('This image cannot be shown: the server cannot be reached.', 'error');
    return;
  }
  const reason = (await response.json().catch(() => ({}))).error || `the server answered ${response.status}`;
  if ($('image').getAttribute('src') !== src) return; // another image is shown meanwhile
  if (response.status !== 422) {
    hint(`This image cannot be shown: ${reason}.`, 'error');
    return;
  }
  // Skipped: the list read again has it no more, so `at` now names another image. That image is shown
  // (the next without a caption, else the one now in its place): a save goes to the image on screen only.
  try {
    await load();
  } catch (problem) {
    hint(`${reason}. ${problem.message}`, 'error');
    return;
  }
  if ($('image').getAttribute('src') !== src) return; // moved on meanwhile: what is shown now stays
  if (!images.length) {
    field.disabled = true;
    for (const id of ['previous', 'next', 'save']) $(id).disabled = true;
    hint(`${reason}. No readable image is left.`, 'error');
    return;
  }
  const next = nextUncaptioned(Math.min(at, images.length) - 1);
  show(next >= 0 ? next : Math.min(at, images.length - 1));
  hint(`${reason}.${next >= 0 ? '' : ` All ${total} images are captioned.`}`, 'error');
});
$('image').addEventListener('click', () => field.focus());
// The keys' actions as buttons, for a touch screen or a mouse; the field keeps the focus for typing on.
const BUTTONS = {
  previous: () => move(-1), next: () => move(1), save: enter, finish,
};
for (const [id, action] of Object.entries(BUTTONS)) {
  $(id).addEventListener('click', async () => {
    await exclusive(action);
    if (!$('session').hidden && !field.disabled) field.focus();
  });
}
// Leaving (a reload, a closed tab) drops what is typed and not saved: the browser asks first.
window.addEventListener('beforeunload', (event) => {
  const typed = field.value.trim();
  if ($('session').hidden || field.disabled || !typed || typed === images[at]?.caption) return;
  event.preventDefault();
  event.returnValue = '';
});

function listProblems(title, rows) {
  if (!rows.length) return;
  const details = document.createElement('details');
  const summary = document.createElement('summary');
  summary.textContent = title;
  const list = document.createElement('ul');
  for (const row of rows.slice(0, 500)) {
    const entry = document.createElement('li');
    entry.textContent = row;
    list.append(entry);
  }
  if (rows.length > 500) list.append(Object.assign(document.createElement('li'), { textContent: '…' }));
  details.append(summary, list);
  $('problems').append(details);
}

// The images and their captions as index.csv has them now: at the start, and after another tab or an
// editor is found to have changed it.
async function load() {
  const response = await fetch('api/state');
  const state = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(state.error || `the server answered ${response.status}`);
  images = state.images;
  count(state.captioned, state.total);
  const unreadable = state.unreadable.map((u) => `${u.path}: ${u.reason}`);
  const open = [...$('problems').querySelectorAll('details')].map((details) => details.open);
  $('problems').replaceChildren();
  listProblems(`${unreadable.length} unreadable image${unreadable.length === 1 ? '' : 's'} skipped`, unreadable);
  const n = state.left_out.length;
  listProblems(`${n} image file${n === 1 ? '' : 's'} left out, of formats a folder's listing does not take `
    + `(${state.formats.join(', ')}); convert them to caption them here`, state.left_out);
  listProblems(state.missing.length === 1 ? '1 row of index.csv names a file that is not here (kept in the file)'
    : `${state.missing.length} rows of index.csv name files that are not here (kept in the file)`, state.missing);
  $('problems').querySelectorAll('details').forEach((details, i) => { details.open = open[i] ?? false; });
  return state;
}

async function start() {
  const state = await load();
  field.disabled = false; // typing before the images are known would be lost
  for (const id of Object.keys(BUTTONS)) $(id).disabled = false;
  show(state.start ?? 0);
  if (state.start === null) allCaptioned();
}

start().catch((problem) => hint(`Cannot load the images: ${problem.message}`, 'error'));
