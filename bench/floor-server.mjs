// The floor of the claim benchmark: node:http on this machine, with nothing behind it. It reads
// and parses the JSON body and answers 201 with a body the size of a claim's answer, so the same
// burst against it shows what Node's HTTP stack alone costs here (no routing, no SQL).
import http from 'node:http';

const answer = JSON.stringify({
  claimId: '00000000-0000-4000-8000-000000000000',
  pool: 'hot',
  userId: 'bench-0-u0',
  container: { id: 'f'.repeat(64), name: 'polydev-hot-0123456789', address: '' },
  warm: true,
  latencyMs: 0.123,
  expiresAt: new Date().toISOString(),
});

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    if (chunks.length) JSON.parse(Buffer.concat(chunks).toString('utf8'));
    res.writeHead(201, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(answer) });
    res.end(answer);
  });
});
server.keepAliveTimeout = 120_000;
server.listen(0, '127.0.0.1', () => process.send?.({ port: server.address().port }));
process.on('disconnect', () => process.exit(0));
