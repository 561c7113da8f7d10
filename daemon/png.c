/*
 * daemon/png.c — see png.h: a stored-block PNG encoder (CRC-32, Adler-32
 * written here) and a small rasteriser with a 5x7 bitmap font. Used by
 * `d2od eval` for its plot; callable from any daemon/ code, one thread per
 * canvas.
 */
#include "daemon/png.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"

/* ---- canvas ---------------------------------------------------------------------- */

int dmn_canvas_init(dmn_canvas *c, int w, int h, dmn_rgb bg) {
    memset(c, 0, sizeof *c);
    if (w <= 0 || h <= 0 || w > 16384 || h > 16384) return D2_EINVAL;
    c->rgb = malloc((size_t)w * (size_t)h * 3);
    if (!c->rgb) return D2_ENOMEM;
    c->w = w;
    c->h = h;
    for (size_t i = 0; i < (size_t)w * (size_t)h; i++) {
        c->rgb[3 * i] = bg.r;
        c->rgb[3 * i + 1] = bg.g;
        c->rgb[3 * i + 2] = bg.b;
    }
    return D2_OK;
}

void dmn_canvas_free(dmn_canvas *c) {
    free(c->rgb);
    memset(c, 0, sizeof *c);
}

void dmn_canvas_pixel(dmn_canvas *c, int x, int y, dmn_rgb col) {
    if (x < 0 || y < 0 || x >= c->w || y >= c->h) return;
    uint8_t *p = c->rgb + ((size_t)y * (size_t)c->w + (size_t)x) * 3;
    p[0] = col.r;
    p[1] = col.g;
    p[2] = col.b;
}

void dmn_canvas_rect(dmn_canvas *c, int x0, int y0, int x1, int y1, dmn_rgb col) {
    if (x0 > x1) { int t = x0; x0 = x1; x1 = t; }
    if (y0 > y1) { int t = y0; y0 = y1; y1 = t; }
    if (x0 < 0) x0 = 0;
    if (y0 < 0) y0 = 0;
    if (x1 >= c->w) x1 = c->w - 1;
    if (y1 >= c->h) y1 = c->h - 1;
    for (int y = y0; y <= y1; y++)
        for (int x = x0; x <= x1; x++) dmn_canvas_pixel(c, x, y, col);
}

void dmn_canvas_line(dmn_canvas *c, int x0, int y0, int x1, int y1, int thick, dmn_rgb col) {
    if (thick < 1) thick = 1;
    int lo = -(thick - 1) / 2, hi = thick / 2;
    int dx = abs(x1 - x0), sx = x0 < x1 ? 1 : -1;
    int dy = -abs(y1 - y0), sy = y0 < y1 ? 1 : -1;
    int err = dx + dy;
    for (;;) {
        dmn_canvas_rect(c, x0 + lo, y0 + lo, x0 + hi, y0 + hi, col);
        if (x0 == x1 && y0 == y1) break;
        int e2 = 2 * err;
        if (e2 >= dy) { err += dy; x0 += sx; }
        if (e2 <= dx) { err += dx; y0 += sy; }
    }
}

/* 5x7 glyphs, one string of 7 rows x 5 columns per character ('#' = ink). */
typedef struct glyph { char ch; const char *rows; } glyph;
static const glyph FONT[] = {
    {'0', " ### #   ##  ### # ###  ##   # ### "},
    {'1', "  #   ##    #    #    #    #   ### "},
    {'2', " ### #   #    #   #   #   #   #####"},
    {'3', "#####   #   #     #     ##   # ### "},
    {'4', "   #   ##  # # #  # #####   #    # "},
    {'5', "######    ####     #    ##   # ### "},
    {'6', "  ##  #   #    #### #   ##   # ### "},
    {'7', "#####    #   #   #   #    #    #   "},
    {'8', " ### #   ##   # ### #   ##   # ### "},
    {'9', " ### #   ##   # ####    #   #  ##  "},
    {'a', " ### #   ##   #######   ##   ##   #"},
    {'b', "#### #   ##   ##### #   ##   ##### "},
    {'c', " ### #   ##    #    #    #   # ### "},
    {'d', "#### #   ##   ##   ##   ##   ##### "},
    {'e', "######    #    #### #    #    #####"},
    {'f', "######    #    #### #    #    #    "},
    {'g', " ### #   ##    # ####   ##   # ####"},
    {'h', "#   ##   ##   #######   ##   ##   #"},
    {'i', " ###   #    #    #    #    #   ### "},
    {'j', "  ###   #    #    #    # #  #  ##  "},
    {'k', "#   ##  # # #  ##   # #  #  # #   #"},
    {'l', "#    #    #    #    #    #    #####"},
    {'m', "#   ### ### # ##   ##   ##   ##   #"},
    {'n', "#   ##   ###  ## # ##  ###   ##   #"},
    {'o', " ### #   ##   ##   ##   ##   # ### "},
    {'p', "#### #   ##   ##### #    #    #    "},
    {'q', " ### #   ##   ##   ## # ##  #  ## #"},
    {'r', "#### #   ##   ##### # #  #  # #   #"},
    {'s', " #####    #     ###     #    ##### "},
    {'t', "#####  #    #    #    #    #    #  "},
    {'u', "#   ##   ##   ##   ##   ##   # ### "},
    {'v', "#   ##   ##   ##   ##   # # #   #  "},
    {'w', "#   ##   ##   ## # ## # ## # # # # "},
    {'x', "#   ##   # # #   #   # # #   ##   #"},
    {'y', "#   ##   # # #   #    #    #    #  "},
    {'z', "#####    #   #   #   #   #    #####"},
    {'.', "                          ##   ##  "},
    {',', "                     ##   ##  #    "},
    {':', "      ##   ##        ##   ##       "},
    {'-', "               #####               "},
    {'+', "       #    #  #####  #    #       "},
    {'=', "          #####     #####          "},
    {'%', "##   ##  #   #   #   #   #  ##   ##"},
    {'/', "    #    #   #   #   #   #    #    "},
    {'(', "   #   #   #    #    #     #     # "},
    {')', " #     #     #    #    #   #   #   "},
    {'_', "                              #####"},
    {'>', "#     #     #     #   #   #   #    "},
    {'<', "    #   #   #   #     #     #     #"},
};

static const char *glyph_rows(char ch) {
    char l = (char)tolower((unsigned char)ch);
    for (size_t i = 0; i < sizeof FONT / sizeof FONT[0]; i++)
        if (FONT[i].ch == l) return FONT[i].rows;
    return NULL;
}

int dmn_canvas_text_width(const char *s, int scale) {
    size_t n = strlen(s);
    return n ? (int)(n * 6 - 1) * scale : 0;
}

int dmn_canvas_text(dmn_canvas *c, int x, int y, const char *s, int scale, dmn_rgb col) {
    if (scale < 1) scale = 1;
    int x0 = x;
    for (; *s; s++, x += 6 * scale) {
        if (*s == ' ') continue;
        const char *rows = glyph_rows(*s);
        for (int r = 0; r < 7; r++) {
            for (int k = 0; k < 5; k++) {
                /* an unknown character draws as a box outline */
                int ink = rows ? rows[r * 5 + k] == '#'
                               : (r == 0 || r == 6 || k == 0 || k == 4);
                if (ink)
                    dmn_canvas_rect(c, x + k * scale, y + r * scale, x + k * scale + scale - 1,
                                    y + r * scale + scale - 1, col);
            }
        }
    }
    return x - x0 - (x > x0 ? scale : 0);
}

/* ---- checksums ------------------------------------------------------------------- */

uint32_t dmn_crc32(uint32_t crc, const uint8_t *p, size_t n) {
    /* Bitwise, reflected polynomial 0xEDB88320: a plot is a few hundred kB,
     * so a table buys nothing worth its code here. */
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int b = 0; b < 8; b++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

uint32_t dmn_adler32(uint32_t a, const uint8_t *p, size_t n) {
    uint32_t s1 = a & 0xffff, s2 = a >> 16;
    while (n > 0) {
        size_t k = n < 5552 ? n : 5552; /* the largest run before the sums can overflow */
        n -= k;
        while (k--) {
            s1 += *p++;
            s2 += s1;
        }
        s1 %= 65521;
        s2 %= 65521;
    }
    return (s2 << 16) | s1;
}

/* ---- encoder --------------------------------------------------------------------- */

static void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Writes a chunk (length, type, data, CRC over type+data) at o; returns the new end. */
static uint8_t *put_chunk(uint8_t *o, const char type[4], const uint8_t *data, size_t n) {
    put32(o, (uint32_t)n);
    memcpy(o + 4, type, 4);
    if (n) memmove(o + 8, data, n);
    put32(o + 8 + n, dmn_crc32(0, o + 4, n + 4));
    return o + 12 + n;
}

int dmn_png_encode(const uint8_t *rgb, int w, int h, uint8_t **out, size_t *len) {
    *out = NULL;
    *len = 0;
    if (!rgb || w <= 0 || h <= 0 || w > 16384 || h > 16384) return D2_EINVAL;
    size_t row = (size_t)w * 3 + 1; /* filter byte + pixels */
    size_t raw_n = row * (size_t)h;
    uint8_t *raw = malloc(raw_n);
    if (!raw) return D2_ENOMEM;
    for (int y = 0; y < h; y++) {
        raw[(size_t)y * row] = 0; /* filter: none */
        memcpy(raw + (size_t)y * row + 1, rgb + (size_t)y * (size_t)w * 3, (size_t)w * 3);
    }
    /* zlib: 2-byte header, stored blocks of at most 65535 bytes (5-byte
     * header each), Adler-32 of the uncompressed data. */
    size_t n_blocks = (raw_n + 65534) / 65535;
    size_t z_n = 2 + raw_n + 5 * n_blocks + 4;
    size_t total = 8 + (12 + 13) + (12 + z_n) + 12;
    uint8_t *png = malloc(total);
    uint8_t *z = malloc(z_n);
    if (!png || !z) {
        free(raw);
        free(png);
        free(z);
        return D2_ENOMEM;
    }
    size_t zo = 0;
    z[zo++] = 0x78; /* CM=8 (deflate), CINFO=7 (32K window) */
    z[zo++] = 0x01; /* FLEVEL 0, no dictionary; (0x78*256+0x01) % 31 == 0 */
    for (size_t off = 0; off < raw_n;) {
        size_t k = raw_n - off < 65535 ? raw_n - off : 65535;
        int final = off + k == raw_n;
        z[zo++] = (uint8_t)final; /* BFINAL, BTYPE=00 (stored) */
        z[zo++] = (uint8_t)(k & 0xff);
        z[zo++] = (uint8_t)(k >> 8);
        z[zo++] = (uint8_t)(~k & 0xff);
        z[zo++] = (uint8_t)((~k >> 8) & 0xff);
        memcpy(z + zo, raw + off, k);
        zo += k;
        off += k;
    }
    put32(z + zo, dmn_adler32(1, raw, raw_n));
    zo += 4;
    free(raw);

    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    uint8_t ihdr[13];
    put32(ihdr, (uint32_t)w);
    put32(ihdr + 4, (uint32_t)h);
    ihdr[8] = 8;  /* bit depth */
    ihdr[9] = 2;  /* colour type: RGB */
    ihdr[10] = 0; /* compression: deflate */
    ihdr[11] = 0; /* filter method 0 */
    ihdr[12] = 0; /* no interlace */
    uint8_t *o = png;
    memcpy(o, sig, 8);
    o += 8;
    o = put_chunk(o, "IHDR", ihdr, sizeof ihdr);
    o = put_chunk(o, "IDAT", z, zo);
    o = put_chunk(o, "IEND", NULL, 0);
    free(z);
    *out = png;
    *len = (size_t)(o - png);
    return D2_OK;
}

int dmn_png_write(const char *path, const uint8_t *rgb, int w, int h) {
    uint8_t *png = NULL;
    size_t n = 0;
    int rc = dmn_png_encode(rgb, w, h, &png, &n);
    if (rc != D2_OK) return rc;
    FILE *f = fopen(path, "wb");
    if (!f) {
        D2_ERROR("png: cannot create %s", path);
        free(png);
        return D2_EIO;
    }
    size_t wr = fwrite(png, 1, n, f);
    int bad = fclose(f) != 0 || wr != n;
    free(png);
    if (bad) {
        D2_ERROR("png: short write to %s", path);
        return D2_EIO;
    }
    return D2_OK;
}
