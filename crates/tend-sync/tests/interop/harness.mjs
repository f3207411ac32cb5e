// Line-protocol harness over a JavaScript negentropy v1 implementation (the port of the
// reference Negentropy.js shipped in the @nostr-dev-kit/sync npm package), for the interop
// tests of tend-sync. Same protocol as the reference harnesses:
// item/seal/initiate/msg in; msg/have/need/done out. FRAMESIZELIMIT: 0 or unset = none.
import { createInterface } from 'node:readline';
import {
  Negentropy,
  NegentropyStorage,
  hexToUint8Array,
  uint8ArrayToHex,
} from '@nostr-dev-kit/sync';

const frameSizeLimit = Number(process.env.FRAMESIZELIMIT || 0);
const storage = new NegentropyStorage();
let ne = null;

async function handle(line) {
  if (!line) return;
  const f = line.split(',');
  if (f[0] === 'item') {
    storage.insert(Number(f[1]), f[2]);
  } else if (f[0] === 'seal') {
    storage.seal();
    ne = new Negentropy(storage, frameSizeLimit);
  } else if (f[0] === 'initiate') {
    const msg = await ne.initiate();
    process.stdout.write('msg,' + uint8ArrayToHex(msg) + '\n');
  } else if (f[0] === 'msg') {
    const res = await ne.reconcile(hexToUint8Array(f[1] || ''));
    const out = [];
    if (ne.isInitiator) {
      for (const id of res.have) out.push('have,' + uint8ArrayToHex(id));
      for (const id of res.need) out.push('need,' + uint8ArrayToHex(id));
      out.push(res.nextMessage === undefined ? 'done' : 'msg,' + uint8ArrayToHex(res.nextMessage));
    } else {
      out.push('msg,' + uint8ArrayToHex(res.nextMessage));
    }
    process.stdout.write(out.join('\n') + '\n');
  } else {
    throw new Error('unknown command ' + f[0]);
  }
}

// Lines are handled strictly in order, each after the previous one finished.
let chain = Promise.resolve();
const rl = createInterface({ input: process.stdin });
rl.on('line', (line) => {
  chain = chain.then(() => handle(line)).catch((e) => {
    process.stderr.write('js harness: ' + e.message + '\n');
    process.exit(1);
  });
});
