// The search page: a text or an image goes to the server, which answers with the top-k hits of the
// same search `clipforge search` runs; each hit shows a server-made thumbnail, its score and path.
// "More results" asks for the next page of the same query and adds it below.

const $ = (id) => document.getElementById(id);
const MAX_QUERY = 4000; // characters of a text query sent: about 50 times what a CLIP text model reads
let latest = 0; // only the newest query's answer is shown
let preview = null;
let current = null; // the query shown: { request(offset, k), what, k, shown }

function status(text, kind = '') {
  $('status').textContent = text;
  $('status').className = `status ${kind}`;
}

function render(data, what, append) {
  const list = $('results');
  if (!append) list.replaceChildren();
  const firstNew = list.children.length;
  for (const hit of data.hits) {
    const item = document.createElement('li');
    item.className = 'hit';
    item.dataset.id = hit.id;
    item.dataset.score = hit.score;
    const link = Object.assign(document.createElement('a'), {
      href: `image?id=${encodeURIComponent(hit.id)}`, target: '_blank', rel: 'noopener',
    });
    const thumb = Object.assign(document.createElement('img'), {
      src: `thumb?id=${encodeURIComponent(hit.id)}`, alt: hit.id, loading: 'lazy',
    });
    // No thumbnail: the server says why (404: moved or deleted since it was indexed; 422: it does not
    // decode), in place of a broken image; the full answer and the path are the tooltip.
    thumb.addEventListener('error', async () => {
      const response = await fetch(thumb.src).catch(() => null);
      const answer = response ? await response.json().catch(() => ({})) : {};
      const label = !response ? 'server not reached'
        : { 404: 'file not found', 422: 'cannot be decoded' }[response.status] ?? `error ${response.status}`;
      link.replaceWith(Object.assign(document.createElement('div'), {
        className: 'missing', textContent: label, title: `${answer.error || label}\n${hit.path}`,
      }));
    });
    link.append(thumb);
    const meta = document.createElement('div');
    meta.className = 'meta';
    meta.append(
      Object.assign(document.createElement('span'), { className: 'rank', textContent: `#${hit.rank}` }),
      Object.assign(document.createElement('span'), { className: 'score', textContent: hit.score.toFixed(4) }),
    );
    // The id is the path inside the indexed folder (shown in the header); the full path is the tooltip.
    const path = Object.assign(document.createElement('div'), {
      className: 'path', textContent: hit.id, title: hit.path,
    });
    item.append(link, meta, path);
    list.append(item);
  }
  // The last page hides "More results": the focus it had goes to the first result it added, not to the page.
  const focusMoves = append && !data.more && document.activeElement === $('more');
  $('more').hidden = !data.more;
  const shown = list.children.length;
  const note = data.note ? ` (${data.note})` : '';
  status(`${shown} result${shown === 1 ? '' : 's'} for ${what} in ${data.ms.toFixed(1)} ms${note}`);
  if (focusMoves) (list.children[firstNew]?.querySelector('a') ?? $('status')).focus();
}

// A new query (offset 0) replaces the results; a further page (offset > 0) is added below them.
async function ask(query, offset = 0) {
  const ticket = ++latest;
  current = query;
  status('Searching…');
  try {
    const response = await query.request(offset, query.k);
    const data = await response.json().catch(() => ({}));
    if (ticket !== latest) return;
    if (!response.ok) throw new Error(data.error || `The server answered ${response.status}.`);
    render(data, query.what, offset > 0);
  } catch (problem) {
    if (ticket !== latest) return;
    // Results of an earlier query under this one's error would read as its answer; a failed further
    // page leaves the pages already shown, which are this query's.
    if (offset === 0) $('results').replaceChildren();
    $('more').hidden = offset === 0;
    // fetch() itself fails ("Failed to fetch") only when the server is not there.
    const gone = problem instanceof TypeError;
    status(gone ? 'The server cannot be reached: is `clipforge serve` still running?' : problem.message, 'error');
  }
}

// The number the field holds as the browser reads it (`1e2` is 100); what it cannot read goes as typed, and the
// server says why it is refused.
function pageSize() {
  const k = $('k').valueAsNumber;
  return Number.isFinite(k) ? String(k) : $('k').value;
}

function byText() {
  const text = $('text').value.trim();
  if (!text) {
    status('Type what to find, or drop an image.');
    return;
  }
  $('query-image').hidden = true;
  ask({
    what: `“${text}”`,
    k: pageSize(),
    // The text model reads its first tokens only (the answer says so), and a URL much longer than this is
    // refused by the HTTP server before the page's own server sees it: a pasted page is cut here.
    request: (offset, k) => fetch(`api/search?${new URLSearchParams({ q: text.slice(0, MAX_QUERY), k, offset })}`),
  });
}

function byImage(file) {
  if (!file) return;
  if (preview) URL.revokeObjectURL(preview);
  preview = URL.createObjectURL(file);
  $('query-preview').src = preview;
  $('query-name').textContent = `query image: ${file.name}`;
  $('query-image').hidden = false;
  ask({
    what: file.name,
    k: pageSize(),
    request: (offset, k) => {
      const form = new FormData();
      form.append('image', file);
      form.append('k', k);
      form.append('offset', offset);
      return fetch('api/search-image', { method: 'POST', body: form });
    },
  });
}

$('query').addEventListener('submit', (event) => {
  event.preventDefault();
  byText();
});
$('file').addEventListener('change', () => byImage($('file').files[0]));
// The file input is hidden behind its label: a button opens it, so the keyboard reaches it too.
$('pick').addEventListener('click', () => $('file').click());
$('more').addEventListener('click', () => {
  if (current) ask(current, $('results').children.length);
});

// Dropping an image anywhere on the page searches with it.
let depth = 0;
document.addEventListener('dragenter', (event) => {
  event.preventDefault();
  depth += 1;
  document.body.classList.add('dragging');
});
document.addEventListener('dragleave', () => {
  depth -= 1;
  if (depth <= 0) document.body.classList.remove('dragging');
});
document.addEventListener('dragover', (event) => event.preventDefault());
document.addEventListener('drop', (event) => {
  event.preventDefault();
  depth = 0;
  document.body.classList.remove('dragging');
  const file = [...event.dataTransfer.files].find((f) => f.type.startsWith('image/'));
  if (file) byImage(file);
  else status('Drop an image file (jpg, png, webp).', 'error');
});
