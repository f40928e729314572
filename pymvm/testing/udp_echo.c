/* udp_echo PORT: send every UDP datagram that arrives on PORT back to its sender.
 *
 * The guest half of the sequence-numbered UDP stream of the back-end swap tests
 * (tests/e2e/test_swap.py) and bench/swap: the host sends numbered datagrams at a fixed
 * rate, this echoes them, and the host sees per swap how long nothing came back and which
 * numbers never did. Built static (pymvm.testing.udp) and put in the guest's initramfs
 * (busybox nc has no UDP).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: udp_echo PORT\n");
        return 2;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                               .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("udp_echo");
        return 1;
    }
    printf("UDP-ECHO-READY\n");
    fflush(stdout);
    char buf[2048];
    for (;;) {
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
        if (n >= 0)
            sendto(s, buf, (size_t)n, 0, (struct sockaddr *)&from, len);
    }
}
