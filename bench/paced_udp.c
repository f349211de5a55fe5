/*
 * The data-path benchmark's paced sender: IPv4/UDP packets at a fixed rate, evenly spread.
 *
 * trafgen cannot pace evenly (its rate mode sends each second's budget in one burst), so this
 * sends every 100 microseconds that interval's share of 46-byte IPv4/UDP packets (18 bytes of
 * payload) over 256 flows (source ports 0x4000..0x40ff) through a raw socket, and spins in
 * between. Built by bench_datapath.py with gcc -O2.
 *
 * Usage: paced_udp SRC DST DPORT RATE SECONDS   (prints the number of packets sent)
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint16_t csum(const void *data, int len)
{
	const uint16_t *p = data;
	uint32_t sum = 0;
	for (; len > 1; len -= 2)
		sum += *p++;
	if (len)
		sum += *(const uint8_t *)p;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: %s SRC DST DPORT RATE SECONDS\n", argv[0]);
		return 2;
	}
	struct in_addr src, dst;
	if (!inet_aton(argv[1], &src) || !inet_aton(argv[2], &dst))
		return 2;
	int dport = atoi(argv[3]);
	double rate = atof(argv[4]), seconds = atof(argv[5]);
	int sock = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
	if (sock < 0) {
		perror("socket");
		return 1;
	}
	static unsigned char packets[256][46];
	for (int i = 0; i < 256; i++) {
		struct iphdr *ip = (struct iphdr *)packets[i];
		struct udphdr *udp = (struct udphdr *)(packets[i] + 20);
		ip->version = 4;
		ip->ihl = 5;
		ip->tot_len = htons(46);
		ip->frag_off = htons(0x4000);
		ip->ttl = 64;
		ip->protocol = IPPROTO_UDP;
		ip->saddr = src.s_addr;
		ip->daddr = dst.s_addr;
		ip->check = csum(ip, 20);
		udp->source = htons(0x4000 + i);
		udp->dest = htons(dport);
		udp->len = htons(26);
		memset(packets[i] + 28, 'a', 18);
	}
	struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr = dst};
	unsigned long sent = 0;
	double start = now(), per_tick = rate / 10000.0;
	for (;;) {
		double elapsed = now() - start;
		if (elapsed >= seconds)
			break;
		unsigned long due = (unsigned long)((unsigned long)(elapsed * 10000.0) * per_tick);
		while (sent < due) {
			if (sendto(sock, packets[sent & 255], 46, 0, (struct sockaddr *)&to, sizeof(to)) < 0)
				break;
			sent++;
		}
	}
	printf("%lu\n", sent);
	return 0;
}
