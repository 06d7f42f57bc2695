// The tests' TurnServer remediation command: kill -9 the coturn in PIDFILE, start it again
// from CONFIG (detached, so this command can exit while coturn runs on), and wait until the
// new process has written its pid. Usage: node restart-coturn.mjs CONFIG PIDFILE
import { spawn } from 'node:child_process';
import fs from 'node:fs';

const [config, pidfile] = process.argv.slice(2);
if (!config || !pidfile) {
  process.stderr.write('usage: restart-coturn.mjs CONFIG PIDFILE\n');
  process.exit(2);
}
// A killed coturn whose parent is gone can stay a zombie (nothing reaps it here): dead all the same.
const alive = (pid) => {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
};
const readPid = () => {
  try {
    return Number(fs.readFileSync(pidfile, 'utf8').trim()) || undefined;
  } catch {
    return undefined;
  }
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// Hang guards (both waits end as soon as their condition holds): a SIGKILLed coturn is gone and a new one
// has written its pidfile within milliseconds on an idle machine, but under the test suite's load on 2
// cores process starts take 5-20x longer (3 s was tight). The pidfile wait stays below the TurnServer's
// default remediation timeout (30 s), so a hung start is still reported by this script, not killed.
const KILL_WAIT_MS = 5_000;
const PIDFILE_WAIT_MS = 20_000;

const old = readPid();
if (old && alive(old)) {
  process.kill(old, 'SIGKILL');
  for (const end = Date.now() + KILL_WAIT_MS; Date.now() < end && alive(old); ) await sleep(20);
}
fs.rmSync(pidfile, { force: true });
const child = spawn('turnserver', ['-c', config], { detached: true, stdio: 'ignore' });
child.unref();
for (const end = Date.now() + PIDFILE_WAIT_MS; Date.now() < end; ) {
  const pid = readPid();
  if (pid && pid !== old && alive(pid)) process.exit(0);
  await sleep(20);
}
process.stderr.write(`coturn did not write ${pidfile} within ${PIDFILE_WAIT_MS} ms\n`);
process.exit(1);
