/*
 * The data-path benchmark's yardstick for the nfqueue mode: a minimal NFQUEUE reader in C.
 *
 * It binds one queue with libnetfilter_queue (same queue length and copy range as the LB's
 * readers), and gives every packet one verdict with a mark: the mark of a table entry picked
 * by a hash of the 5-tuple (IPv4 and IPv6, ports of TCP, UDP and SCTP), the way a C Maglev
 * reader (nfqlb) does it. Built by bench_datapath.py with
 *
 *     gcc -O2 -o nfq_reader nfq_reader.c -lnetfilter_queue
 *
 * Usage: nfq_reader QUEUE QUEUE-LEN COPY-RANGE TABLE-SIZE FIRST-MARK TARGETS
 * Entry i of the table holds FIRST-MARK + i % TARGETS. Runs until SIGTERM or SIGINT and then
 * prints the number of packets it gave a verdict.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static volatile sig_atomic_t stop;
static unsigned long handled;
static uint32_t *table;
static uint32_t table_size;

static void on_signal(int sig) { (void)sig; stop = 1; }

static uint32_t mix(uint32_t h, uint32_t v)
{
	h ^= v;
	h *= 0x9e3779b1u;
	return h ^ (h >> 15);
}

/* A hash of the 5-tuple of an IP packet; 0 when it has none we can read. */
static uint32_t tuple_hash(const unsigned char *p, int len)
{
	uint32_t h = 0x811c9dc5u;
	int off, proto;
	if (len < 20)
		return 0;
	if ((p[0] >> 4) == 4) {
		off = (p[0] & 15) * 4;
		proto = p[9];
		for (int i = 12; i < 20; i += 4)
			h = mix(h, (uint32_t)p[i] << 24 | p[i + 1] << 16 | p[i + 2] << 8 | p[i + 3]);
	} else {
		if (len < 40)
			return 0;
		off = 40;
		proto = p[6];
		for (int i = 8; i < 40; i += 4)
			h = mix(h, (uint32_t)p[i] << 24 | p[i + 1] << 16 | p[i + 2] << 8 | p[i + 3]);
	}
	h = mix(h, (uint32_t)proto);
	if ((proto == 6 || proto == 17 || proto == 132) && len >= off + 4)
		h = mix(h, (uint32_t)p[off] << 24 | p[off + 1] << 16 | p[off + 2] << 8 | p[off + 3]);
	return h;
}

static int callback(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data)
{
	(void)msg;
	(void)data;
	struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
	unsigned char *payload;
	int len = nfq_get_payload(nfa, &payload);
	uint32_t id = ph ? ntohl(ph->packet_id) : 0;
	uint32_t mark = table[tuple_hash(payload, len) % table_size];
	handled++;
	return nfq_set_verdict2(qh, id, NF_ACCEPT, mark, 0, NULL);
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: %s QUEUE QUEUE-LEN COPY-RANGE TABLE-SIZE FIRST-MARK TARGETS\n",
			argv[0]);
		return 2;
	}
	uint16_t queue = (uint16_t)atoi(argv[1]);
	uint32_t qlen = (uint32_t)atoi(argv[2]);
	uint32_t range = (uint32_t)atoi(argv[3]);
	table_size = (uint32_t)atoi(argv[4]);
	uint32_t first = (uint32_t)atoi(argv[5]);
	uint32_t targets = (uint32_t)atoi(argv[6]);
	if (!table_size || !targets)
		return 2;
	table = calloc(table_size, sizeof(*table));
	for (uint32_t i = 0; i < table_size; i++)
		table[i] = first + i % targets;

	struct nfq_handle *h = nfq_open();
	if (!h) {
		perror("nfq_open");
		return 1;
	}
	struct nfq_q_handle *qh = nfq_create_queue(h, queue, &callback, NULL);
	if (!qh) {
		perror("nfq_create_queue");
		return 1;
	}
	if (nfq_set_mode(qh, NFQNL_COPY_PACKET, range) < 0 || nfq_set_queue_maxlen(qh, qlen) < 0) {
		perror("nfq_set_mode/maxlen");
		return 1;
	}
	int fd = nfq_fd(h);
	int rcvbuf = 8 * 1024 * 1024;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf));

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	printf("ready\n");
	fflush(stdout);

	char buf[65536] __attribute__((aligned));
	while (!stop) {
		int n = recv(fd, buf, sizeof(buf), 0);
		if (n < 0) {
			if (errno == EINTR || errno == ENOBUFS)
				continue;
			perror("recv");
			break;
		}
		nfq_handle_packet(h, buf, n);
	}
	printf("%lu\n", handled);
	nfq_destroy_queue(qh);
	nfq_close(h);
	return 0;
}
