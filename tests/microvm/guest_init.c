/* A tiny static PID 1 for backend tests (no agent needed): prints a marker, optionally mounts a
 * virtio-fs share given as "share=TAG" on the kernel cmdline at /mnt and prints /mnt/hello.txt,
 * "flood" writes 2 MiB to the console, "hang" never returns, then it reboots. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <unistd.h>

static void put(const char *s) { if (write(1, s, strlen(s)) < 0) {} }

int main(int argc, char **argv) {
    put("GUEST-INIT-UP\n");
    mount("proc", "/proc", "proc", 0, 0);
    char cmd[2048] = {0};
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) { if (read(fd, cmd, sizeof cmd - 1) < 0) {} close(fd); }
    char *s = strstr(cmd, "share=");
    if (s) {
        char tag[64] = {0};
        sscanf(s + 6, "%63s", tag);
        if (mount(tag, "/mnt", "virtiofs", 0, 0) == 0) {
            char buf[256] = {0};
            int f = open("/mnt/hello.txt", O_RDONLY);
            if (f >= 0 && read(f, buf, sizeof buf - 1) > 0) { put("SHARE:"); put(buf); put("\n"); }
            int w = open("/mnt/guest-wrote.txt", O_WRONLY | O_CREAT | O_TRUNC, 0644);
            put(w >= 0 ? "SHARE-WRITE-OK\n" : "SHARE-WRITE-DENIED\n");
            if (w >= 0) close(w);
        } else {
            put("SHARE-MOUNT-FAILED\n");
        }
    }
    if (strstr(cmd, "flood")) {
        static char line[1024];
        memset(line, 'x', sizeof line - 1);
        line[sizeof line - 1] = '\n';
        for (int i = 0; i < 2048; i++) if (write(1, line, sizeof line) < 0) break;  /* 2 MiB */
        put("FLOOD-END\n");
        sleep(1);  /* let the host drain the port before the reboot ends QEMU */
    }
    if (strstr(cmd, "hang")) { put("HANGING\n"); for (;;) pause(); }
    (void)argc; (void)argv;
    sync();
    reboot(RB_AUTOBOOT);
    return 0;
}
