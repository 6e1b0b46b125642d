/* A program that records when it was built, as many real programs do.
 * __DATE__ and __TIME__ are filled in by the compiler from its clock and timezone,
 * so two bare builds made at different moments (or in different timezones) differ.
 */
#include <stdio.h>

static const char built[] = "built " __DATE__ " " __TIME__;

int main(void)
{
    puts(built);
    return 0;
}
